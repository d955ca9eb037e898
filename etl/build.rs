//! Embeds the jobs under `jobs/` (every `jobs/<name>/job.toml` and its `v<N>.sql` files) into the
//! library, so `ktk etl` carries the shipped jobs wherever it runs. A job added as files is in the
//! next build; `--jobs-dir` reads jobs from a directory at run time instead.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let jobs = manifest_dir.join("jobs");
    println!("cargo:rerun-if-changed={}", jobs.display());
    let mut files = Vec::new();
    collect(&jobs, &jobs, &mut files);
    files.sort();
    let mut out = String::from(
        "/// (path under `jobs/`, contents) of every embedded job file.\npub(crate) const EMBEDDED_JOB_FILES: &[(&str, &str)] = &[\n",
    );
    for (relative, absolute) in &files {
        println!("cargo:rerun-if-changed={}", absolute.display());
        writeln!(out, "    ({relative:?}, include_str!({:?})),", absolute.display().to_string())
            .expect("write to a String");
    }
    out.push_str("];\n");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out_dir.join("embedded_jobs.rs"), out).expect("write embedded_jobs.rs");
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect(root, &path, files);
        } else if path.extension().is_some_and(|e| e == "toml" || e == "sql") {
            let relative = path.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/");
            files.push((relative, path));
        }
    }
}
