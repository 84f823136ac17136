"""A hostile or broken Hub against ``pull``: what it answers becomes paths in the cache, so an ETag, a file name
or a revision that would lead out of it is refused with one line, and nothing is written anywhere. The real
huggingface_hub client talks to a loopback Hub (tests/hub_fixture.py) that answers the attack."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests import hub_fixture
from tests.hub_fixture import Hub, serve_hub
from tests.test_pull import FAKE, error_line, pull

ESCAPED = "escaped"  # what every attack below tries to create in the test's directory, outside HF_HOME


class _HostileHub(hub_fixture._Handler):
    """The fixture's Hub; it also serves org/escape-GGUF's file at the path the client's URL normalization made of
    its name (httpx resolves the ``../`` segments), as a Hub that wants the file fetched would."""

    def do_GET(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        repo = self.hub.repos.get("org/escape-GGUF")
        for name in repo.files if repo else ():
            if "/resolve/" not in path and path.endswith("/" + Path(name).name):
                self.hub.requests.append((self.command, path, None))
                self._send_file(repo, repo.revisions["main"], name)
                return
        super().do_GET()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.Q4_K_M.gguf").write_bytes(FAKE)
    h = Hub()
    h.add_repo("org/evil-GGUF", repo)
    with serve_hub(h, _HostileHub):
        yield h


def _outside(tmp_path: Path) -> list[Path]:
    """Whatever an attack made outside the Hub cache, and any blob, partial or link it left inside it."""
    made = [p for p in tmp_path.rglob(f"{ESCAPED}*")]
    cache = tmp_path / "home" / "hub"
    made += [p for p in cache.rglob("*") if p.is_file() or p.is_symlink()] if cache.exists() else []
    return made


@pytest.mark.parametrize(
    ("etag", "message"),
    [
        (f'"../../../../{ESCAPED}"', "is neither a SHA-1 nor a SHA-256"),  # blobs/../../../../ = the test's dir
        (f'"0000/../../../../../{ESCAPED}"', "is neither a SHA-1 nor a SHA-256"),  # a '/' in it
        ('"' + "0" * 4096 + '"', "is neither a SHA-1 nor a SHA-256"),  # longer than a file name may be
        ('"' + "a" * 40 + '\x00"', "downloading model.Q4_K_M.gguf from org/evil-GGUF failed"),  # a NUL in it
        ('"not-a-digest"', "is neither a SHA-1 nor a SHA-256"),
    ],
    ids=["dot-dot", "slash", "absurd-length", "nul", "not-hex"],
)
def test_a_hostile_etag_is_refused_and_nothing_is_written(hub: Hub, tmp_path: Path, etag: str,
                                                          message: str) -> None:
    hub.repos["org/evil-GGUF"].etags["model.Q4_K_M.gguf"] = etag
    proc = pull(hub.url, tmp_path / "home", "org/evil-GGUF")
    line = error_line(proc)
    assert message in line and len(line) < 300, line
    assert _outside(tmp_path) == []


@pytest.mark.parametrize("etag", [f'W/"{hashlib.sha256(FAKE).hexdigest()}"', f'"{"ab" * 20}"'],
                         ids=["weak-sha256", "git-sha1"])
def test_the_hubs_own_etag_forms_are_accepted(hub: Hub, tmp_path: Path, etag: str) -> None:
    """A weak ``W/"..."`` ETag (huggingface_hub takes the prefix off) and a git file's SHA-1 are blob names."""
    hub.repos["org/evil-GGUF"].etags["model.Q4_K_M.gguf"] = etag
    proc = pull(hub.url, tmp_path / "home", "org/evil-GGUF")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.read_bytes() == FAKE
    assert path.resolve().name == etag.removeprefix("W/").strip('"')


def test_a_file_name_leading_out_of_the_snapshot_is_refused(hub: Hub, tmp_path: Path) -> None:
    """The repository's listing names its files; one named ``../../../../../escaped.Q4_K_M.gguf`` would put the
    snapshot's link in the test's directory."""
    repo = tmp_path / "escape"
    repo.mkdir()
    (repo / "model.gguf").write_bytes(FAKE)
    hub.add_repo("org/escape-GGUF", repo)
    files = hub.repos["org/escape-GGUF"].files
    files[f"../../../../../{ESCAPED}.Q4_K_M.gguf"] = files.pop("model.gguf")
    proc = pull(hub.url, tmp_path / "home", "org/escape-GGUF")
    assert "would lie outside" in error_line(proc)
    assert _outside(tmp_path) == []


@pytest.mark.parametrize("args", [["org/evil-GGUF@../../../../x"], ["org/evil-GGUF", "--revision", "../../x"],
                                  ["org/evil-GGUF@a/./b:Q4_K_M"]])
def test_a_revision_leading_out_of_the_cache_is_refused_before_asking_the_hub(hub: Hub, tmp_path: Path,
                                                                              args: list[str]) -> None:
    """A revision names a file under the cache's refs/ (huggingface_hub writes it there unchecked)."""
    proc = pull(hub.url, tmp_path / "home", *args)
    assert "not a branch, tag or commit name" in error_line(proc)
    assert hub.requests == []
    assert _outside(tmp_path) == []


@pytest.mark.parametrize("etag", [None, "", "a" * 40 + "\0", "A" * 64, "a" * 63, "a" * 65, "a" * 40 + "\n",
                                  "../" + "a" * 61, "a" * 32 + "/" + "a" * 31])
def test_only_a_sha1_or_sha256_names_a_blob(etag: str | None) -> None:
    """The whole rule, including what no HTTP client lets through (a NUL, a newline)."""
    from convert.errors import PipelineError
    from convert.hub_download import blob_name

    with pytest.raises(PipelineError, match="ETag"):
        blob_name(etag)
    assert blob_name("a" * 40) == "a" * 40 and blob_name("0" * 64) == "0" * 64
