"""Start `demos/app.py` in its own process and wait for the URL it prints (shared by the app tests)."""
import os
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args=(), env=None, timeout=240):
    """``(process, url)``; url is None when the app exited or printed nothing in ``timeout`` s.

    The process's output keeps being drained afterwards: a full pipe would block the app.
    """
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "demos", "app.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    url, deadline = None, time.time() + timeout
    while url is None and time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"tokenprune app running at (http://\S+)", line)
        url = m.group(1) if m else None
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, url
