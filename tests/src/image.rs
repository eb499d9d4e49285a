//! The agent's container image that `cargo xtask image` builds: where the archive is, and what
//! it holds (a docker-archive: `manifest.json`, the image config, one tarball per layer), read
//! with `tar`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The docker-archive `cargo xtask test` built (env `KA_AGENT_IMAGE`).
pub fn archive() -> PathBuf {
    std::env::var_os("KA_AGENT_IMAGE").map_or_else(
        || {
            panic!(
                "KA_AGENT_IMAGE is not set: `cargo xtask test` builds the image and sets it \
                 (or run `cargo xtask image` and set it to target/image/keepalive-agent.tar)"
            )
        },
        PathBuf::from,
    )
}

/// The oci-archive of the index of both architectures (env `KA_AGENT_IMAGE_INDEX`).
pub fn index_archive() -> PathBuf {
    std::env::var_os("KA_AGENT_IMAGE_INDEX").map_or_else(
        || {
            panic!(
                "KA_AGENT_IMAGE_INDEX is not set: `cargo xtask test` builds the image and sets \
                 it (or run `cargo xtask image` and set it to target/image/keepalive-agent.oci.tar)"
            )
        },
        PathBuf::from,
    )
}

/// The ELF machine (`e_machine`) of the executable at `path`: 62 for x86-64, 183 for aarch64.
pub fn elf_machine(path: &Path) -> u16 {
    let elf = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        elf.get(..4),
        Some(b"\x7fELF".as_slice()),
        "{}",
        path.display()
    );
    u16::from_le_bytes([elf[0x12], elf[0x13]])
}

/// The name and tag the archive carries: `localhost/keepalive-agent:<version>`.
pub fn reference() -> String {
    format!("localhost/keepalive-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// A docker-archive unpacked into a temporary directory, removed on drop.
#[derive(Debug)]
pub struct Unpacked {
    dir: PathBuf,
    /// `manifest.json`'s only entry.
    pub manifest: serde_json::Value,
    /// The image config (`config.Entrypoint`, `config.Labels`, ...).
    pub config: serde_json::Value,
}

impl Unpacked {
    pub fn open(archive: &Path) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name());
        fs::create_dir(&dir).expect("create a temporary directory");
        let mut unpacked = Self {
            dir,
            manifest: serde_json::Value::Null,
            config: serde_json::Value::Null,
        };
        tar(&["-xf"], archive, &unpacked.dir);
        let manifest = unpacked.json("manifest.json");
        let entries = manifest.as_array().expect("manifest.json is an array");
        assert_eq!(entries.len(), 1, "one image in the archive: {manifest}");
        unpacked.manifest = entries[0].clone();
        unpacked.config = unpacked.json(
            unpacked.manifest["Config"]
                .as_str()
                .expect("manifest Config"),
        );
        unpacked
    }

    fn json(&self, name: &str) -> serde_json::Value {
        let text = fs::read_to_string(self.dir.join(name))
            .unwrap_or_else(|e| panic!("{name} in the image archive: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn layers(&self) -> Vec<PathBuf> {
        self.manifest["Layers"]
            .as_array()
            .expect("manifest Layers")
            .iter()
            .map(|layer| self.dir.join(layer.as_str().expect("a layer's path")))
            .collect()
    }

    /// Every path in every layer (directories end in `/`), without a leading `./` or `/`.
    pub fn files(&self) -> Vec<String> {
        let mut files = Vec::new();
        for layer in self.layers() {
            let out = Command::new("tar")
                .arg("-tf")
                .arg(&layer)
                .output()
                .expect("run tar");
            assert!(out.status.success(), "tar -tf {}", layer.display());
            files.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|line| line.trim_start_matches("./").trim_start_matches('/'))
                    .filter(|line| !line.is_empty())
                    .map(str::to_string),
            );
        }
        files
    }

    /// Extracts `path` (as [`Unpacked::files`] names it) from the layers into the temporary
    /// directory and returns where it is.
    pub fn extract(&self, path: &str) -> PathBuf {
        let root = self.dir.join("rootfs");
        fs::create_dir_all(&root).expect("create rootfs");
        for layer in self.layers() {
            tar(&["-xf"], &layer, &root);
        }
        let file = root.join(path);
        assert!(file.is_file(), "{path} is not in the image's layers");
        file
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ignored = fs::remove_dir_all(&self.dir);
    }
}

fn tar(args: &[&str], archive: &Path, into: &Path) {
    crate::succeeds(
        Command::new("tar")
            .args(args)
            .arg(archive)
            .arg("-C")
            .arg(into),
    );
}

/// Whether the ELF executable at `path` names a program interpreter (PT_INTERP), that is,
/// needs a dynamic loader and a libc in the image.
pub fn is_dynamically_linked(path: &Path) -> bool {
    const PT_INTERP: usize = 3;
    let elf = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        elf.get(..6),
        Some(b"\x7fELF\x02\x01".as_slice()),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let field = |offset: usize, len: usize| -> usize {
        let value = elf[offset..offset + len]
            .iter()
            .rev()
            .fold(0_u64, |value, byte| (value << 8) | u64::from(*byte));
        usize::try_from(value).expect("an ELF field fits usize")
    };
    let (phoff, phentsize, phnum) = (field(0x20, 8), field(0x36, 2), field(0x38, 2));
    (0..phnum).any(|index| field(phoff + index * phentsize, 4) == PT_INTERP)
}
