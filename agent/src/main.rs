//! `kip-agent`: the edge agent binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "kip-agent {} (protocol {}): the agent runtime is not built yet",
        env!("CARGO_PKG_VERSION"),
        kip_agent::PROTOCOL_VERSION
    )
}
