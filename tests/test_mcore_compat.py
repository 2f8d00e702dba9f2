"""The megatron-core version seam (hetero_convert/megatron/compat.py): the installed version and the tested
range, the forms of layer specs, the common-state forms hf-to-megatron writes, and integrity manifests."""

from __future__ import annotations

import functools
import hashlib
import json
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from hetero_convert.convert import ConversionError, hf_to_megatron, megatron_to_hf
from hetero_convert.errors import CheckpointError
from hetero_convert.io.dcp import DCPReader
from hetero_convert.megatron import compat
from hetero_convert.megatron.compat import COMMON_STATE_KEY, INTEGRITY_FILE, read_common_state

REPO = Path(__file__).resolve().parents[1]


# ---- version -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, inside", [("0.16.1", True), ("0.19.2", True), ("0.19.0rc1", True),
                                          ("0.18.0.dev0+abc", True), ("0.16.0", False), ("0.15.3", False),
                                          ("0.20.0", False), ("1.0", False)])
def test_version_range(monkeypatch, text, inside):
    monkeypatch.setattr(compat._metadata, "version", lambda name: text)
    warning = compat.version_warning()
    assert (warning is None) == inside
    if not inside:
        assert f"megatron-core {'.'.join(map(str, compat.installed_version()))} is installed" in warning
        assert "megatron-core>=0.16.1,<0.20" in warning


def test_pyproject_declares_the_tested_range():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert compat.REQUIREMENT in deps
    lo, hi = compat.SUPPORTED
    assert compat.REQUIREMENT == f"megatron-core>={'.'.join(map(str, lo))},<{hi[0]}.{hi[1]}"


def test_version_of_a_source_checkout_is_read_not_executed(monkeypatch, tmp_path):
    """Megatron-LM on PYTHONPATH has no dist-info: its package_info.py is read as text, never run (0.19's runs
    git in a subprocess)."""
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "package_info.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\nMAJOR = 0\nMINOR = 21\nPATCH = 3\n")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(compat._metadata, "version", missing)
    monkeypatch.setattr(compat._import_util, "find_spec",
                        lambda name: type("Spec", (), {"origin": str(core / "__init__.py")})())
    assert compat.installed_version() == (0, 21, 3)
    assert "megatron-core 0.21.3 is installed" in compat.version_warning()
    assert not (tmp_path / "ran").exists()
    monkeypatch.setattr(compat._import_util, "find_spec", lambda name: None)
    assert compat.installed_version() is None and "not installed" in compat.version_warning()


@pytest.mark.parametrize("args, warns", [(["spec", "/nonexistent"], True), (["hf-to-megatron", "/no", "/out"], True),
                                         (["inspect", "/nonexistent"], False), (["megatron-to-hf", "/no", "/out"], False)])
def test_cli_says_once_on_stderr_when_megatron_core_is_outside_the_range(monkeypatch, args, warns):
    from typer.testing import CliRunner

    from hetero_convert.cli import app

    monkeypatch.setattr(compat._metadata, "version", lambda name: "0.20.1")
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0  # the commands fail on their missing inputs, after the start-up check
    text = r.stderr if hasattr(r, "stderr") else r.output
    assert text.count("megatron-core 0.20.1 is installed") == (1 if warns else 0), text
    if not warns:
        return
    # only rank 0 of a torchrun job says it (these two fail on their input before joining any process group)
    monkeypatch.setenv("RANK", "1")
    for k, v in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, args)
    assert "is installed" not in (r.stderr if hasattr(r, "stderr") else r.output)


# ---- layer specs ---------------------------------------------------------------------------------------


@pytest.mark.megatron
def test_describe_reads_modulespec_and_partial_forms_alike():
    """0.16/0.17 give the MLP as a ModuleSpec, 0.18/0.19 as a partial of a bound classmethod (MLP) or of a
    class (the gathered linear), and a no-op MLP as the bare class: all describe alike, in either version."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.heterogeneous.linear_replacements import ColumnParallelLinearGathered
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    as_016 = ModuleSpec(module=MLP, submodules=subs)
    assert compat.describe(as_016) == "MLP(ColumnParallelLinear, RowParallelLinear)"
    bound = MLP.as_mlp_submodule if hasattr(MLP, "as_mlp_submodule") else classmethod(lambda cls: cls).__get__(None, MLP)
    assert compat.describe(functools.partial(bound, submodules=subs)) == compat.describe(as_016)
    assert compat.module_class(functools.partial(bound, submodules=subs)) is MLP
    gathered = functools.partial(ColumnParallelLinearGathered, tp_comm_buffer_name="linear_mlp")
    assert compat.describe(gathered) == compat.describe(ModuleSpec(module=ColumnParallelLinearGathered)) \
        == "ColumnParallelLinearGathered"
    assert compat.describe(IdentityOp) == compat.describe(ModuleSpec(module=IdentityOp)) == "IdentityOp"


# ---- common state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, pt, obj", [("any", True, True), ("0.16", True, False), ("0.17", True, False),
                                             ("0.18", True, False), ("0.19", False, True)])
def test_common_state_forms_per_target(tiny_sources, tmp_path, target, pt, obj):
    out = tmp_path / "meg"
    hf_to_megatron(tiny_sources["tiny-tied"], out, tp=2, megatron_core=target)
    it = out / "release"
    reader = DCPReader(it)
    assert (it / "common.pt").is_file() == pt and (COMMON_STATE_KEY in reader.object_keys()) == obj
    assert json.loads((it / "metadata.json").read_text()) == compat.METADATA_JSON
    if obj:  # exactly what megatron 0.19 stores: torch.save([state]), one record in rank 0's file
        assert reader.load_object(COMMON_STATE_KEY) == [{"iteration": 0, "checkpoint_version": 3.0}]
        info = next(i for k, i in reader.metadata.storage_data.items() if k.fqn == COMMON_STATE_KEY)
        assert info.relative_path.startswith("__0_")
    if pt:
        assert torch.load(it / "common.pt", weights_only=True) == {"iteration": 0, "checkpoint_version": 3.0}
    assert read_common_state(it) == {"iteration": 0, "checkpoint_version": 3.0}
    megatron_to_hf(out, tmp_path / "back")  # every form reads back


def test_unknown_target_is_refused_before_anything_is_written(tiny_sources, tmp_path):
    with pytest.raises(ConversionError, match=r"must be one of any, 0\.16, 0\.17, 0\.18, 0\.19, got '0\.20'"):
        hf_to_megatron(tiny_sources["tiny-tied"], tmp_path / "meg", megatron_core="0.20")
    assert not (tmp_path / "meg").exists()


# ---- integrity manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ('{"algorithm": "md5", "files": {}}', "hash algorithm 'md5' is not supported"),
    ('{"files": {"../x": "' + "0" * 64 + '"}}', "not a plain file name"),
    ('{"files": {"a\\nb": "' + "0" * 64 + '"}}', "not a plain file name"),
    ('{"files": {"integrity.json": "' + "0" * 64 + '"}}', "not a plain file name"),
    ('{"files": {"__0_0.distcp": "abc"}}', "not a sha256 hex digest"),
    ('{"algorithm": "sha256"}', "no 'files' object"),
    ('[1, 2]', "no 'files' object"),
    ('{"files": ', "not valid JSON"),
])
def test_integrity_manifest_refusals(tmp_path, body, message):
    (tmp_path / INTEGRITY_FILE).write_text(body)
    with pytest.raises(CheckpointError, match=message) as e:
        compat.read_integrity_manifest(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path / INTEGRITY_FILE) in str(e.value)


def write_manifest(it: Path) -> dict:
    """integrity.json as megatron-core writes it: every regular file of the folder but itself, sha256."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(it.iterdir())
             if p.is_file() and p.name != INTEGRITY_FILE}
    (it / INTEGRITY_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    return files


def test_integrity_manifest_is_checked_before_the_output_is_committed(tiny_sources, tmp_path):
    hf_to_megatron(tiny_sources["tiny-every-kind"], tmp_path / "meg", tp=2)
    it = tmp_path / "meg" / "release"
    files = write_manifest(it)
    s = megatron_to_hf(tmp_path / "meg", tmp_path / "ok")
    assert s.layout["integrity_verified_files"] == len(files)
    # One byte of a weight changed: the data still loads, but no longer matches the manifest.
    info = next(i for k, i in DCPReader(it).metadata.storage_data.items() if k.fqn == "embedding.word_embeddings.weight")
    with open(it / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ConversionError, match=rf"1 file\(s\) differ from integrity.json, nothing written:\n  - "
                                              rf"{info.relative_path}: sha256 "):
        megatron_to_hf(tmp_path / "meg", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    s = megatron_to_hf(tmp_path / "meg", tmp_path / "unchecked", verify_integrity=False)
    assert any("integrity.json: not verified" in w for w in s.warnings)
    # A listed file that is gone is named too.
    (it / "common.pt").unlink()
    with pytest.raises(ConversionError, match="common.pt: listed in integrity.json, missing from the folder"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "bad")
