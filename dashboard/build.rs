//! Embeds the dashboard's front-end bundle (`web/dist/dashboard.js` and `web/dist/dashboard.css`,
//! built from `web/src` and uPlot by `web/scripts/setup.sh`) into the crate, so `ktk dashboard`
//! serves it without files next to the binary. When the bundle has not been built, the crate
//! still builds: the page then says how to build it (see `assets.rs`).

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let dist = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("web/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let mut out = String::new();
    for (constant, file) in [("BUNDLE_JS", "dashboard.js"), ("BUNDLE_CSS", "dashboard.css")] {
        let path = dist.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        if path.is_file() {
            out.push_str(&format!(
                "pub const {constant}: Option<&[u8]> = Some(include_bytes!({:?}));\n",
                path.display().to_string()
            ));
        } else {
            out.push_str(&format!("pub const {constant}: Option<&[u8]> = None;\n"));
        }
    }
    let target = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("bundle.rs");
    fs::write(target, out).expect("write bundle.rs");
}
