//! The integration suite (tests/tests/suite): one test binary whose modules were binaries of
//! their own. It is linked once, and each module still runs in a process of its own, one after
//! another (the binary with the other modules skipped), on the host and in the guests: their
//! tests never ran beside another module's, and they still do not.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The suite's test target (tests/tests/suite/main.rs).
pub(crate) const TARGET: &str = "suite";

/// The suite's modules by name, sorted: each `NAME.rs` beside its main.rs, which must declare
/// it (a file it does not declare would never run).
pub(crate) fn modules(workspace: &Path) -> anyhow::Result<Vec<String>> {
    let dir = workspace.join("tests/tests").join(TARGET);
    let main_rs = dir.join("main.rs");
    let main = fs::read_to_string(&main_rs)
        .with_context(|| format!("cannot read {}", main_rs.display()))?;
    let mut modules = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let (Some("rs"), Some(name)) = (
            path.extension().and_then(|ext| ext.to_str()),
            path.file_stem().and_then(|stem| stem.to_str()),
        ) else {
            continue;
        };
        if name == "main" {
            continue;
        }
        if !main
            .lines()
            .any(|line| line.trim() == format!("mod {name};"))
        {
            bail!(
                "{} is not a module of {} (`mod {name};`): its tests would never run",
                path.display(),
                main_rs.display()
            );
        }
        modules.push(name.to_owned());
    }
    modules.sort();
    // `--skip NAME::` skips every test whose path contains it: no module's name may end
    // another's, or skipping one would skip some of the other's tests.
    for name in &modules {
        if let Some(longer) = modules
            .iter()
            .find(|other| *other != name && other.ends_with(name.as_str()))
        {
            bail!("suite modules `{longer}` and `{name}`: `--skip {name}::` would skip both");
        }
    }
    Ok(modules)
}

/// libtest's arguments that leave only `module` of `modules` to run.
pub(crate) fn only(module: &str, modules: &[String]) -> Vec<String> {
    modules
        .iter()
        .filter(|other| *other != module)
        .flat_map(|other| ["--skip".to_owned(), format!("{other}::")])
        .collect()
}

/// `names` checked against the suite's modules: each must be one.
pub(crate) fn select(names: &[String], modules: &[String]) -> anyhow::Result<Vec<String>> {
    if names.is_empty() {
        return Ok(modules.to_vec());
    }
    for name in names {
        if !modules.contains(name) {
            bail!(
                "--only {name}: not a module of the suite (tests/tests/{TARGET}/): {}",
                modules.join(", ")
            );
        }
    }
    Ok(names.to_vec())
}

/// Builds the suite with `cargo`, a `cargo test` command whose profile and target are set;
/// returns the binary.
pub(crate) fn build(mut cargo: Command) -> anyhow::Result<PathBuf> {
    let out = cargo
        .args([
            "--locked",
            "--no-run",
            "--package",
            "keepalive-tests",
            "--test",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot build the integration suite")?;
    if !out.status.success() {
        bail!("building the integration suite failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|message| message["target"]["name"] == TARGET)
        .and_then(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no binary for the integration suite")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_s_modules_are_its_files_and_one_is_selected_by_skipping_the_others() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let modules = modules(&workspace).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            modules.iter().any(|name| name == "enforcement"),
            "{modules:?}"
        );
        let args = only("enforcement", &modules);
        assert_eq!(args.len(), 2 * (modules.len() - 1));
        assert!(!args.contains(&"enforcement::".to_owned()));
        assert!(args.contains(&"policy::".to_owned()));
        assert!(select(&["nonesuch".to_owned()], &modules).is_err());
    }
}
