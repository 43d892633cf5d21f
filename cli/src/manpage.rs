//! `kmount man`: clap_mangen's page for the main command, followed by a section per
//! subcommand with its arguments (clap_mangen alone lists subcommands by name only).

use std::fmt::Write as _;

/// The whole page, roff.
pub fn render(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let mut more = String::new();
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let _ = writeln!(more, ".SH \"KMOUNT {}\"", sub.get_name().to_uppercase());
        let usage = sub
            .clone()
            .bin_name(format!("kmount {}", sub.get_name()))
            .render_usage()
            .to_string();
        let usage = usage.trim_start_matches("Usage: ");
        let _ = writeln!(more, ".B {}", roff(usage));
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            let _ = writeln!(more, ".PP\n{}", roff(&about.to_string()));
        }
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let name = match (arg.get_short(), arg.get_long()) {
                (Some(s), Some(l)) => format!("-{s}, --{l}"),
                (None, Some(l)) => format!("--{l}"),
                (Some(s), None) => format!("-{s}"),
                (None, None) => format!("<{}>", arg.get_id().as_str().to_uppercase()),
            };
            if name == "-h, --help" {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let _ = writeln!(more, ".TP\n\\fB{}\\fR\n{}", roff(&name), roff(&help));
        }
        if let Some(after) = sub.get_after_help() {
            let _ = writeln!(more, ".PP\n.nf\n{}\n.fi", roff(&after.to_string()));
        }
    }
    page.extend_from_slice(more.as_bytes());
    Ok(page)
}

/// Escapes text for roff: backslashes, hyphens, and lines that would read as requests.
fn roff(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\\\").replace('-', "\\-");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(roff("a-b\\c\n.x"), "a\\-b\\\\c\n\\&.x");
    }
}
