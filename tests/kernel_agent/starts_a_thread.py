"""A module that starts a thread when imported: a fork server must refuse to fork after it."""

from __future__ import annotations

import threading

threading.Thread(target=threading.Event().wait, daemon=True).start()
