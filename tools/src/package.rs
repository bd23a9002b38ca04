//! What the Debian package installs beside the binary, generated from `tether-agent`'s clap
//! declaration (`agent::args`): the man page (clap_mangen) and completions for bash, zsh and
//! fish (clap_complete). Run at packaging time (`tether package-assets --out DIR`) so neither
//! generator is in the device binary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

/// The files written, by path.
pub fn write_assets(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cmd = agent::args::Cli::command();
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "tether-agent", out)
            .with_context(|| format!("cannot write the {shell} completions"))?;
        written.push(path);
    }
    let man = out.join("tether-agent.1");
    let mut page = Vec::new();
    clap_mangen::Man::new(agent::args::Cli::command())
        .render(&mut page)
        .context("cannot render the man page")?;
    std::fs::write(&man, page).with_context(|| format!("cannot write {}", man.display()))?;
    written.push(man);
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn the_man_page_and_completions_name_the_commands() {
        let out = std::env::temp_dir().join(format!("tether-assets-{}", std::process::id()));
        let written = super::write_assets(&out).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "tether-agent.bash",
                "_tether-agent",
                "tether-agent.fish",
                "tether-agent.1"
            ]
        );
        let man = std::fs::read_to_string(out.join("tether-agent.1")).unwrap();
        assert!(man.contains(".TH tether-agent"), "{man}");
        assert!(man.contains("run") && man.contains("config"), "{man}");
        let bash = std::fs::read_to_string(out.join("tether-agent.bash")).unwrap();
        assert!(bash.contains("--embedded-broker") && bash.contains("defaults"));
        std::fs::remove_dir_all(&out).unwrap();
    }
}
