"""The committed protobuf code is exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    gen_protos = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = gen_protos
    spec.loader.exec_module(gen_protos)
    fresh = tmp_path / "_proto"
    gen_protos.generate(fresh)
    committed = ROOT / "budget_client" / "_proto"
    fresh_files = {p.relative_to(fresh): p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    committed_files = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh_files) == sorted(committed_files)
    stale = [str(name) for name, data in fresh_files.items() if committed_files[name] != data]
    assert not stale, f"run `make protos`: stale generated files {stale}"
