use clap::Parser;
use palisade_ztunnel::config::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _logging = palisade_mesh::logging::Logging::init(config.log_json);
    // Before any worker thread exists: they then share the capped malloc arenas.
    palisade_ztunnel::limits::init_process();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(config.workers().max(1)).enable_all().build()?;
    runtime.block_on(palisade_ztunnel::run(config))
}
