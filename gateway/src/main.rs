fn main() -> std::process::ExitCode {
    citygw::cli::main()
}
