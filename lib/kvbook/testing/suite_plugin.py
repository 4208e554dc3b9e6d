"""pytest plugin (`-p kvbook.testing.suite_plugin`) for llama.cpp's server test suite run, unmodified, against a
server kvbook started (the suite's DEBUG_EXTERNAL mode). The two adaptations, and nothing else:

1. every request to KVBOOK_SUITE_BASE carries KVBOOK_SUITE_KEY as a bearer token: kvbook's LiteLLM route wants its
   per-run key and the suite sends none (direct to llama-server no key is set, so nothing is added);
2. a stand-in `wget` module when none is installed: the suite's utils.py imports wget (its requirements.txt pins
   wget~=3.2, kvbook's lock does not have it) but only its download_file() uses it, which the Anthropic suite never
   calls; the stand-in refuses to download, so nothing is fetched at run time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

import requests


def _no_download(url: str, *args: Any, **kwargs: Any) -> str:
    raise RuntimeError(f"kvbook runs llama.cpp's suite offline: refusing to download {url}")


if importlib.util.find_spec("wget") is None:
    _stub = types.ModuleType("wget")
    _stub.__doc__ = "kvbook's stand-in: llama.cpp's utils.py imports wget; the Anthropic suite never downloads"
    setattr(_stub, "download", _no_download)
    sys.modules["wget"] = _stub

_BASE = os.environ.get("KVBOOK_SUITE_BASE", "")
_KEY = os.environ.get("KVBOOK_SUITE_KEY", "")

if _BASE and _KEY:
    _request = requests.Session.request

    def _with_key(self: requests.Session, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        """Session.request, adding the route's key to requests for the route (the suite passes headers=None)."""
        if str(url).startswith(_BASE):
            headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if v is not None}
            headers.setdefault("Authorization", f"Bearer {_KEY}")
            kwargs["headers"] = headers
        return _request(self, method, url, *args, **kwargs)

    setattr(requests.Session, "request", _with_key)
