"""The server's socket folders: one per server, and those of killed servers are removed by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from eet_pipe.serving import server


def test_a_killed_servers_folder_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = tmp_path / f"{server.IPC_PREFIX}{int(gone.stdout)}-abc123"
    live = tmp_path / f"{server.IPC_PREFIX}{os.getpid()}-def456"
    other = tmp_path / "eet_pipe-ipc-notapid"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "engine").write_text("")
    server._remove_stale_ipc_folders()
    assert not dead.exists()
    assert live.exists() and other.exists()
