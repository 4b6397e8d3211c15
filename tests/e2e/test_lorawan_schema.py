"""The gateway decodes ChirpStack's binary events with its own subset of ChirpStack's published
schema (proto/chirpstack). Every message, field and enum value it declares must have the name,
number and type of ChirpStack's own (the `chirpstack-api` package), or binary events would be
misread without any error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

ROOT = Path(__file__).resolve().parents[2]
SUBSET = ROOT / "proto" / "chirpstack"


def test_subset_matches_chirpstack_api(tmp_path):
    import grpc_tools
    from chirpstack_api.integration import integration_pb2  # noqa: F401 - registers the pool

    out = tmp_path / "subset.pb"
    files = sorted(str(p.relative_to(SUBSET)) for p in SUBSET.rglob("*.proto"))
    assert files == ["common/common.proto", "gw/gw.proto", "integration/integration.proto"]
    p = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{SUBSET}",
                        f"-I{os.path.join(os.path.dirname(grpc_tools.__file__), '_proto')}",
                        f"--descriptor_set_out={out}", *files], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    theirs = descriptor_pool.Default()
    checked = 0
    for f in fds.file:
        for m in f.message_type:
            ref = theirs.FindMessageTypeByName(f"{f.package}.{m.name}")
            for field in m.field:
                t = ref.fields_by_name.get(field.name)
                assert t is not None, f"{ref.full_name} has no field {field.name}"
                assert (t.number, t.type) == (field.number, field.type), \
                    f"{ref.full_name}.{field.name}: ours {(field.number, field.type)}, ChirpStack's {(t.number, t.type)}"
                checked += 1
        for e in f.enum_type:
            ref = theirs.FindEnumTypeByName(f"{f.package}.{e.name}")
            for v in e.value:
                assert ref.values_by_name[v.name].number == v.number, f"{e.name}.{v.name}"
                checked += 1
    assert checked > 50
