// glibc's malloc was a sixth of the gateway's CPU under ingest load (perf, bench/mqtt_ingest);
// mimalloc's per-thread heaps remove most of it. Built with on-demand commit (.cargo/config.toml)
// to keep idle connections small. See docs/decisions/0003.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    citygw::cli::main()
}
