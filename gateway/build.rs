//! Compiles proto/citygw/v1 with protox (pure Rust), so no system `protoc` is needed, and the
//! subset of ChirpStack's integration schema the LoRaWAN bridge decodes (proto/chirpstack).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The runtime variable, not env!(): a build script binary reused from another checkout must
    // still read this checkout's schema.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files: Vec<_> = std::fs::read_dir(root.join("citygw/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    let fds = protox::compile(&files, [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC server reflection.
    std::fs::write(
        out.join("citygw_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // The KPI messages are also the JSON of `/api/v1/kpi` and `citygw kpi report`.
    let mut builder = tonic_prost_build::configure();
    for message in [
        "ConnectionKpi",
        "KpiFigures",
        "KindFigures",
        "CommuneKpi",
        "KpiSnapshot",
        "TargetProjection",
    ] {
        builder = builder.message_attribute(
            format!(".citygw.v1.{message}"),
            "#[derive(serde::Serialize, serde::Deserialize)]",
        );
    }
    builder.compile_fds(fds)?;

    let chirpstack = root.join("chirpstack");
    let fds = protox::compile(
        [
            "integration/integration.proto",
            "gw/gw.proto",
            "common/common.proto",
        ],
        [&chirpstack],
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
