//! Every flag the programs take, as their `--help` lists it, against the
//! README's lists of them, as an operator reads one beside the other: each
//! flag `--help` shows is in the README's table (or, for `trellisctl`, its
//! synopsis) of that program, with the default `--help` shows; each flag the
//! README lists there is taken; and each flag's environment variable is the
//! `TRELLIS_<FLAG>` twin the README's rule names.

use std::collections::BTreeSet;

use anyhow::{Context, bail, ensure};
use trellis_tests::{Launcher, Program};

fn readme() -> anyhow::Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    Ok(std::fs::read_to_string(path)?)
}

/// The README's text under `heading` (a whole line), up to the next heading
/// of the same level or above.
fn section<'a>(readme: &'a str, heading: &str) -> anyhow::Result<&'a str> {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let start = readme
        .lines()
        .position(|line| line == heading)
        .with_context(|| format!("the README has no heading {heading:?}"))?;
    let lines: Vec<&str> = readme.lines().collect();
    let end = lines[start + 1..]
        .iter()
        .position(|line| {
            let hashes = line.chars().take_while(|&c| c == '#').count();
            (1..=level).contains(&hashes) && line[hashes..].starts_with(' ')
        })
        .map_or(lines.len(), |n| start + 1 + n);
    let from = lines[..=start].iter().map(|l| l.len() + 1).sum::<usize>();
    let to = lines[..end].iter().map(|l| l.len() + 1).sum::<usize>();
    Ok(&readme[from.min(readme.len())..to.min(readme.len())])
}

/// The `--help` of `program` with `args` (a subcommand path).
fn help(launcher: &Launcher, program: Program, args: &[&str]) -> anyhow::Result<String> {
    let out = launcher
        .command(program)
        .args(args)
        .arg("--help")
        .output()
        .with_context(|| format!("cannot run {}", program.binary_name()))?;
    ensure!(
        out.status.success(),
        "{} {} --help exited {}: {}",
        program.binary_name(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// One option of a `--help`: its long name, short name, environment
/// variable and default value.
#[derive(Debug)]
struct Opt {
    long: String,
    short: Option<char>,
    env: Option<String>,
    default: Option<String>,
}

/// The options of a `--help`, `--help` and `--version` left out.
fn options(help: &str) -> Vec<Opt> {
    let mut opts: Vec<Opt> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line == "Options:" {
            in_options = true;
            continue;
        }
        if !in_options {
            continue;
        }
        let trimmed = line.trim_start();
        let (short, rest) = match trimmed.as_bytes() {
            [b'-', c, b',', b' ', ..] if *c != b'-' && line.starts_with("  ") => {
                (Some(*c as char), &trimmed[4..])
            }
            _ => (None, trimmed),
        };
        let starts_option =
            line.starts_with("  ") && !line.starts_with("          ") && rest.starts_with("--");
        if starts_option {
            let long: String = rest[2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            opts.push(Opt {
                long,
                short,
                env: None,
                default: None,
            });
        }
        if let (Some(opt), Some((_, default))) = (opts.last_mut(), line.split_once("[default: ")) {
            opt.default = default.split_once(']').map(|(value, _)| value.to_string());
        }
        if let (Some(opt), Some((_, env))) = (opts.last_mut(), line.split_once("[env: ")) {
            let name: String = env
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            opt.env = Some(name);
        }
    }
    opts.retain(|o| o.long != "help" && o.long != "version");
    opts
}

/// The subcommands a `--help` lists, `help` left out.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags (`--name`) written in `text`.
fn written_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + 2..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(name);
        }
    }
    flags
}

/// The rows of the first Markdown table whose header names `Flag` in `text`.
fn flag_table(text: &str) -> anyhow::Result<Vec<&str>> {
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.starts_with("| Flag |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .collect();
    ensure!(!rows.is_empty(), "no `| Flag |` table");
    Ok(rows)
}

/// `TRELLIS_<FLAG>`: upper case, dashes as underscores.
fn twin(long: &str) -> String {
    format!("TRELLIS_{}", long.to_uppercase().replace('-', "_"))
}

/// The faults of one program's table against its `--help`: flags not in the
/// table, flags the table's first column names that the program does not
/// take, defaults the table does not give, and environment variables that
/// are not the flag's twin.
fn table_faults(name: &str, help: &str, table: &[&str]) -> Vec<String> {
    let opts = options(help);
    let taken: BTreeSet<&str> = opts.iter().map(|o| o.long.as_str()).collect();
    let in_table = written_flags(&table.join("\n"));
    let first_column = written_flags(
        &table
            .iter()
            .map(|row| row.split('|').nth(1).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let mut faults = Vec::new();
    if opts.is_empty() {
        faults.push(format!("{name}: no options read from --help"));
    }
    for opt in &opts {
        if !in_table.contains(&opt.long) {
            faults.push(format!(
                "{name}: --{} is not in the README's table",
                opt.long
            ));
        }
        match &opt.env {
            Some(env) if *env == twin(&opt.long) => {}
            other => faults.push(format!(
                "{name}: --{}'s environment variable is {other:?}, not {}",
                opt.long,
                twin(&opt.long)
            )),
        }
    }
    // A default that is one value (not a sentence, not empty) is written in
    // the Default column of each row naming the flag.
    for opt in &opts {
        let Some(default) = opt.default.as_deref() else {
            continue;
        };
        if default.contains(' ') || default == "\"\"" {
            continue;
        }
        for row in table {
            let cells: Vec<&str> = row.split('|').collect();
            let (Some(flags), Some(column)) = (cells.get(1), cells.get(2)) else {
                continue;
            };
            if written_flags(flags).contains(&opt.long) && !column.contains(&format!("`{default}`"))
            {
                faults.push(format!(
                    "{name}: --{} defaults to {default}; the README's table says {}",
                    opt.long,
                    column.trim()
                ));
            }
        }
    }
    for flag in &first_column {
        if !taken.contains(flag.as_str()) {
            faults.push(format!(
                "{name}: the README's table lists --{flag}, which it does not take"
            ));
        }
    }
    faults
}

#[test]
fn readme_lists_every_flag_of_the_control_plane_and_the_sidecar() -> anyhow::Result<()> {
    let launcher = Launcher::from_build_dir()?;
    let readme = readme()?;
    let mut faults = Vec::new();
    for (name, program, args, heading) in [
        (
            "trellis-control-plane",
            Program::ControlPlane,
            &[][..],
            "### trellis-control-plane",
        ),
        (
            "trellis-proxy",
            Program::Proxy,
            &[][..],
            "### trellis-proxy",
        ),
        (
            "trellis-proxy init",
            Program::Proxy,
            &["init"][..],
            "### trellis-proxy init",
        ),
    ] {
        let help = help(&launcher, program, args)?;
        let table =
            flag_table(section(&readme, heading)?).with_context(|| format!("under {heading:?}"))?;
        faults.extend(table_faults(name, &help, &table));
    }
    if !faults.is_empty() {
        bail!("the README and --help disagree:\n{}", faults.join("\n"));
    }
    Ok(())
}

/// The flags `trellisctl` takes before or after any subcommand's name,
/// described in the prose below its synopsis.
const CTL_GLOBAL: [&str; 5] = ["control-plane", "state-dir", "ca", "cert", "key"];

#[test]
fn readme_synopsis_of_trellisctl_matches_its_help() -> anyhow::Result<()> {
    let launcher = Launcher::from_build_dir()?;
    let readme = readme()?;
    let section = section(&readme, "### trellisctl")?;
    let synopsis: Vec<&str> = section
        .lines()
        .skip_while(|line| !line.starts_with("```"))
        .skip(1)
        .take_while(|line| !line.starts_with("```"))
        .collect();
    ensure!(!synopsis.is_empty(), "no synopsis under `### trellisctl`");
    // Each command of the synopsis with its continuation lines.
    let mut usages: Vec<String> = Vec::new();
    for line in synopsis {
        let line = line.split("   #").next().unwrap_or(line);
        if line.starts_with("trellisctl") {
            usages.push(line.to_string());
        } else if let Some(last) = usages.last_mut() {
            last.push(' ');
            last.push_str(line.trim());
        }
    }

    let mut faults = Vec::new();
    let top = help(&launcher, Program::Ctl, &[])?;
    for opt in options(&top) {
        if !CTL_GLOBAL.contains(&opt.long.as_str()) {
            faults.push(format!(
                "trellisctl --{} is not a known global flag",
                opt.long
            ));
        }
    }
    for global in CTL_GLOBAL {
        if !section.contains(&format!("`--{global}`")) {
            faults.push(format!(
                "the README does not describe trellisctl's --{global}"
            ));
        }
    }

    // Every leaf subcommand, depth first.
    let mut pending: Vec<Vec<String>> = subcommands(&top).into_iter().map(|s| vec![s]).collect();
    let mut seen_usages = BTreeSet::new();
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let help = help(&launcher, Program::Ctl, &args)?;
        let children = subcommands(&help);
        if !children.is_empty() {
            pending.extend(children.into_iter().map(|c| {
                let mut next = path.clone();
                next.push(c);
                next
            }));
            continue;
        }
        let name = path.join(" ");
        // The synopsis line of this subcommand: its words right after the
        // program's name and any global flags (`...` or written out).
        let usage = usages.iter().enumerate().find(|(_, usage)| {
            let words: Vec<&str> = usage
                .split_whitespace()
                .skip(1)
                .filter(|w| *w != "...")
                .collect();
            let mut words = words.as_slice();
            while let [flag, _value, rest @ ..] = words {
                if !flag.starts_with("--") {
                    break;
                }
                words = rest;
            }
            words.len() >= args.len() && words[..args.len()] == args[..]
        });
        let Some((index, usage)) = usage else {
            faults.push(format!(
                "trellisctl {name} has no line in the README's synopsis"
            ));
            continue;
        };
        seen_usages.insert(index);
        let opts = options(&help);
        let written = written_flags(usage);
        let shorts: BTreeSet<char> = usage
            .split(|c: char| c.is_whitespace() || "[]|".contains(c))
            .filter_map(|w| match w.as_bytes() {
                [b'-', c] if c.is_ascii_alphabetic() => Some(*c as char),
                _ => None,
            })
            .collect();
        for opt in &opts {
            let global = CTL_GLOBAL.contains(&opt.long.as_str());
            let shown =
                written.contains(&opt.long) || opt.short.is_some_and(|c| shorts.contains(&c));
            if !global && !shown {
                faults.push(format!(
                    "trellisctl {name} --{} is not in the README's synopsis",
                    opt.long
                ));
            }
            match &opt.env {
                Some(env) if *env == twin(&opt.long) => {}
                // `policy explain`'s request flags have no twin (README,
                // Configuration).
                None if name == "policy explain"
                    && ["path", "method", "header", "http2"].contains(&opt.long.as_str()) => {}
                other => faults.push(format!(
                    "trellisctl {name} --{}'s environment variable is {other:?}, not {}",
                    opt.long,
                    twin(&opt.long)
                )),
            }
        }
        for flag in &written {
            let taken = opts.iter().any(|o| &o.long == flag) || CTL_GLOBAL.contains(&flag.as_str());
            if !taken {
                faults.push(format!(
                    "the README's synopsis gives trellisctl {name} --{flag}, which it does not take"
                ));
            }
        }
        for short in &shorts {
            if !opts.iter().any(|o| o.short == Some(*short)) {
                faults.push(format!(
                    "the README's synopsis gives trellisctl {name} -{short}, which it does not take"
                ));
            }
        }
    }
    for (index, usage) in usages.iter().enumerate() {
        if !seen_usages.contains(&index) {
            faults.push(format!(
                "the README's synopsis line {usage:?} names no subcommand of trellisctl"
            ));
        }
    }
    if !faults.is_empty() {
        bail!(
            "the README and trellisctl's --help disagree:\n{}",
            faults.join("\n")
        );
    }
    Ok(())
}
