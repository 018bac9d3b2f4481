//! `cargo xtask image`: the agent's OCI image, built offline from the local build.

pub fn image(_args: &[String]) -> Result<(), String> {
    Err("cargo xtask image: not built yet".to_string())
}
