//! Where the agent's files are when nobody says: agent.toml, the database and the model zoo.
//! One rule for every subcommand, so `tether-agent cache stats` run by hand on a device finds
//! the database the service writes, and `tether-agent run` without `--config` the file the
//! service reads. Pure: the environment and the file system are passed in.

use std::path::{Path, PathBuf};

/// Where the Debian package installs the configuration, the state and the zoo.
pub const SYSTEM_CONFIG: &str = "/etc/tether/agent.toml";
pub const SYSTEM_STATE_DIR: &str = "/var/lib/tether";
pub const SYSTEM_ZOO: &str = "/usr/share/tether/zoo";

/// The database's file name in a state directory.
pub const DB_FILE: &str = "tether.db";

/// agent.toml: `--config`, else `$TETHER_CONFIG`, else `agent.toml` in systemd's
/// `$CONFIGURATION_DIRECTORY`, else `/etc/tether/agent.toml`; the last two only when they
/// exist. `None`: no file, the defaults.
pub fn config_file(
    explicit: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    exists: &dyn Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env("TETHER_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = first_dir(env("CONFIGURATION_DIRECTORY")) {
        let p = dir.join("agent.toml");
        if exists(&p) {
            return Some(p);
        }
    }
    let system = PathBuf::from(SYSTEM_CONFIG);
    exists(&system).then_some(system)
}

/// The database when `store.path` is not set: in systemd's `$STATE_DIRECTORY`, else in
/// `/var/lib/tether` when the service's database is there, else in the working directory.
pub fn store_path(env: &dyn Fn(&str) -> Option<String>, exists: &dyn Fn(&Path) -> bool) -> PathBuf {
    if let Some(dir) = first_dir(env("STATE_DIRECTORY")) {
        return dir.join(DB_FILE);
    }
    let system = Path::new(SYSTEM_STATE_DIR).join(DB_FILE);
    if exists(&system) {
        return system;
    }
    PathBuf::from(DB_FILE)
}

/// The model zoo when neither `--models`, `$TETHER_MODELS` nor `models_dir` says: `./models/zoo`
/// in a checkout, else the package's `/usr/share/tether/zoo`, else the zoo of the source tree
/// this binary was built from.
pub fn zoo(exists: &dyn Fn(&Path) -> bool) -> PathBuf {
    for dir in ["models/zoo", SYSTEM_ZOO] {
        let dir = PathBuf::from(dir);
        if exists(&dir.join(models::manifest::MANIFEST_FILE)) {
            return dir;
        }
    }
    models::default_zoo_dir()
}

/// systemd may pass several directories, colon-separated; the first is ours.
fn first_dir(dirs: Option<String>) -> Option<PathBuf> {
    let dirs = dirs?;
    let first = dirs.split(':').next().filter(|d| !d.is_empty())?;
    Some(PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (explicit, TETHER_CONFIG, CONFIGURATION_DIRECTORY, files that exist, expected)
    type Case = (
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
        &'static [&'static str],
        Option<&'static str>,
    );

    #[test]
    fn the_configuration_is_found_in_order() {
        let files =
            |have: &'static [&'static str]| move |p: &Path| have.iter().any(|h| Path::new(h) == p);
        // (explicit, TETHER_CONFIG, CONFIGURATION_DIRECTORY, files that exist, expected)
        let cases: [Case; 8] = [
            (
                Some("/x.toml"),
                Some("/env.toml"),
                Some("/cfg"),
                &["/cfg/agent.toml", SYSTEM_CONFIG],
                Some("/x.toml"),
            ),
            (
                None,
                Some("/env.toml"),
                Some("/cfg"),
                &["/cfg/agent.toml", SYSTEM_CONFIG],
                Some("/env.toml"),
            ),
            (
                None,
                Some(""),
                Some("/cfg"),
                &["/cfg/agent.toml"],
                Some("/cfg/agent.toml"),
            ),
            (
                None,
                None,
                Some("/cfg:/other"),
                &["/cfg/agent.toml"],
                Some("/cfg/agent.toml"),
            ),
            (
                None,
                None,
                Some("/cfg"),
                &[SYSTEM_CONFIG],
                Some(SYSTEM_CONFIG),
            ),
            (None, None, None, &[SYSTEM_CONFIG], Some(SYSTEM_CONFIG)),
            (None, None, None, &[], None),
            // An explicit file is returned even when missing: loading it says so.
            (
                Some("/missing.toml"),
                None,
                None,
                &[],
                Some("/missing.toml"),
            ),
        ];
        for (i, (explicit, tether, confdir, have, want)) in cases.into_iter().enumerate() {
            let env = move |k: &str| match k {
                "TETHER_CONFIG" => tether.map(str::to_owned),
                "CONFIGURATION_DIRECTORY" => confdir.map(str::to_owned),
                _ => None,
            };
            let got = config_file(explicit.map(Path::new), &env, &files(have));
            assert_eq!(got, want.map(PathBuf::from), "case {i}");
        }
    }

    #[test]
    fn the_database_and_the_zoo_are_found_the_same_way_everywhere() {
        let none = |_: &str| None;
        let nothing = |_: &Path| false;
        let service_db = |p: &Path| p == Path::new("/var/lib/tether/tether.db");
        let state = |k: &str| (k == "STATE_DIRECTORY").then(|| "/run/state:/x".to_owned());
        assert_eq!(
            store_path(&state, &service_db),
            PathBuf::from("/run/state/tether.db")
        );
        assert_eq!(
            store_path(&none, &service_db),
            PathBuf::from("/var/lib/tether/tether.db")
        );
        assert_eq!(store_path(&none, &nothing), PathBuf::from("tether.db"));
        let packaged = |p: &Path| p == Path::new("/usr/share/tether/zoo/MANIFEST.toml");
        assert_eq!(zoo(&packaged), PathBuf::from(SYSTEM_ZOO));
        assert_eq!(zoo(&nothing), models::default_zoo_dir());
    }
}
