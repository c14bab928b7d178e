"""A malicious or broken ``.bin`` given to ``facesphere eval`` is refused in one line naming it, exit 2, and its
payload never runs."""

from __future__ import annotations

import pickle
import subprocess

import pytest
from _training import cli, env

from facesphere.evaluate.binsets import BinFormatError, UnsafePickleError, read_bin
from facesphere.models.card import ModelCard
from facesphere.models.store import save_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    card = ModelCard(name="tiny", backbone="mobilefacenet", input_size=(112, 112), colour_order="RGB",
                     mean=(127.5,) * 3, std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=32,
                     licence="test", source="test")
    return save_model(tmp_path_factory.mktemp("m") / "tiny", card.build_backbone(), card)


def _malicious(path, marker) -> None:
    """A protocol-0 pickle whose GLOBAL opcode names os.system, called with a command creating ``marker``."""
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")


def test_unsafe_pickle_error_is_a_value_error(tmp_path):
    marker = tmp_path / "ran"
    _malicious(tmp_path / "evil.bin", marker)
    with pytest.raises(UnsafePickleError, match="refusing to load global os.system") as caught:
        read_bin(tmp_path / "evil.bin")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, pickle.UnpicklingError)
    assert str(tmp_path / "evil.bin") in str(caught.value) and not marker.exists()
    with pytest.raises(BinFormatError, match="cannot read"):
        read_bin(tmp_path)


@pytest.mark.parametrize("kind", ["malicious", "folder", "truncated"])
def test_cli_eval_refuses_a_bad_bin_in_one_line(tmp_path, model, kind):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    if kind == "malicious":
        _malicious(path, marker)
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(pickle.dumps(([b"\xff\xd8\xff" * 10] * 2, [True]), protocol=2)[:-7])
    done = subprocess.run(cli("eval", str(model), "bin", str(path), "--out", str(tmp_path / "out")), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    log = " ".join(done.stderr.split())  # the log handler wraps long lines
    assert "Traceback" not in log and log.count("error: ") == 1 and "evil.bin:" in log.split("error: ")[1], log
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_huge_or_overdeclared_bin_is_refused_before_it_is_read(tmp_path):
    """A sparse file over the size cap is refused from its size; a BINBYTES8 item declaring more than the image
    cap (or than the file holds) is refused by the streamed read, not allocated and read."""
    path = tmp_path / "huge.bin"
    with path.open("wb") as handle:
        handle.truncate(2**20)
    with pytest.raises(BinFormatError, match="too large for a .bin file"):
        read_bin(path, max_bytes=2**20 - 1)
    path.write_bytes(b"\x80\x04\x8e" + (2**27).to_bytes(8, "little") + b"abc")  # declares 128 MB, holds 3 bytes
    with pytest.raises(BinFormatError, match="exceeds the .* limit of one image") as caught:
        read_bin(path)
    assert str(path) in str(caught.value)
