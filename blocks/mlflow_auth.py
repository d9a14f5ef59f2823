"""MLflow HTTP basic-auth credentials from the MLflowConfig block, kept out of the environment.

MLflow's default way to send credentials is the MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
environment variables, read at each request. Anything in `os.environ` is inherited by every child
process -- the Java converters of the PMML exporter, `git`, anything a flow starts -- so the
password would travel to all of them. Instead this module registers an MLflow request-auth
provider (MLflow's documented plugin interface: the `mlflow.request_auth_provider` entry-point
group, activated by MLFLOW_TRACKING_AUTH=<provider name>) that adds the Authorization header from
credentials held in this process's memory, per server origin: a request to another host never
gets them. The only variable set is MLFLOW_TRACKING_AUTH, whose value is the provider's name.

The project runs from a checkout rather than an installed distribution, so the entry point is
published in-process: a metadata finder on `sys.meta_path` reports a small distribution that
declares it, and MLflow finds the provider when it first loads its request-auth registry.
"""
from __future__ import annotations

import base64
import importlib.abc
import importlib.metadata
import os
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from requests.auth import AuthBase

from tasks.errors import ConfigurationError

PROVIDER_NAME = "mlops-flows-block"
ENTRY_POINT_GROUP = "mlflow.request_auth_provider"
AUTH_VARIABLE = "MLFLOW_TRACKING_AUTH"
DISTRIBUTION_NAME = "mlops-flows-mlflow-auth"

_lock = threading.Lock()
_credentials: dict[str, str] = {}  # origin -> Authorization header value
_verified = False


def origin(uri: str | None) -> str | None:
    """`scheme://host:port` of an http(s) URI (user info dropped); None for other schemes."""
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


def use_credentials(uris: list[str], username: str | None, password: str | None) -> None:
    """Send these credentials to the servers of `uris` from now on (none: forget theirs)."""
    origins = {o for o in map(origin, uris) if o}
    header = None
    if username and password:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        header = f"Basic {token}"
    with _lock:
        if all(_credentials.get(o) == header for o in origins):  # also: no http(s) server
            return
        if header is not None:
            _activate()
        for o in origins:
            if header is None:
                _credentials.pop(o, None)
            else:
                _credentials[o] = header
        if not _credentials and os.environ.get(AUTH_VARIABLE) == PROVIDER_NAME:
            del os.environ[AUTH_VARIABLE]


def _activate() -> None:
    """Point MLflow at the provider (caller holds the lock)."""
    global _verified
    current = os.environ.get(AUTH_VARIABLE)
    if current and current != PROVIDER_NAME:
        raise ConfigurationError(
            f"the MLflowConfig block has a username and password, but {AUTH_VARIABLE} is set to "
            f"{current!r} (another MLflow auth plugin); only one can authenticate: unset "
            f"{AUTH_VARIABLE}, or leave username/password empty in the block")
    if current != PROVIDER_NAME:  # written only on change: setenv races with threads reading it
        os.environ[AUTH_VARIABLE] = PROVIDER_NAME
    if _verified:
        return
    from mlflow.tracking.request_auth.registry import fetch_auth

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = fetch_auth(PROVIDER_NAME)
    if found is not _AUTH:
        raise ConfigurationError(
            "MLflow's request-auth plugin registry was loaded before mlops-flows could register "
            "the provider that sends the MLflowConfig block's credentials; import `blocks` "
            "before making MLflow requests, or set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD yourself and leave them empty in the block")
    _verified = True


def header_for(url: str) -> str | None:
    key = origin(url)
    with _lock:
        return _credentials.get(key) if key else None


# --------------------------------------------------------------------------- the MLflow plugin
class OriginBasicAuth(AuthBase):
    """Adds the Authorization header of the request's server, if credentials are known for it."""

    def __call__(self, request):
        header = header_for(request.url)
        if header is not None:
            request.headers["Authorization"] = header
        return request


_AUTH = OriginBasicAuth()


def _provider_class():
    from mlflow.tracking.request_auth.abstract_request_auth_provider import RequestAuthProvider

    class BlockCredentialsProvider(RequestAuthProvider):
        def get_name(self):
            return PROVIDER_NAME

        def get_auth(self):
            return _AUTH

    return BlockCredentialsProvider


def __getattr__(name: str):
    # The entry point names `blocks.mlflow_auth:BlockCredentialsProvider`; it is built on first
    # use so that importing this module does not import MLflow.
    if name == "BlockCredentialsProvider":
        cls = _provider_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


class _PluginDistribution(importlib.metadata.Distribution):
    _files = {
        "METADATA": f"Metadata-Version: 2.1\nName: {DISTRIBUTION_NAME}\nVersion: 1\n",
        "entry_points.txt": (f"[{ENTRY_POINT_GROUP}]\n"
                             f"{PROVIDER_NAME} = blocks.mlflow_auth:BlockCredentialsProvider\n"),
    }

    def read_text(self, filename):
        return self._files.get(filename)

    def locate_file(self, path):
        return Path(__file__).parent / path


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Finds no modules; reports the distribution that declares the entry point."""

    def find_spec(self, fullname, path, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        wanted = context.name
        if wanted is None or wanted.replace("_", "-").lower() == DISTRIBUTION_NAME:
            yield _PluginDistribution()


def install_entry_point() -> None:
    if not any(isinstance(f, _PluginFinder) for f in sys.meta_path):
        sys.meta_path.append(_PluginFinder())


install_entry_point()
