"""Errors of the ``pki`` package."""

from __future__ import annotations


class PkiError(Exception):
    """An operator-facing problem with certificates, keys or their files.

    ``str(e)`` is one line that names the cause and the fix, for example
    "no root CA at /x/ca/rootCA.pem: create it with `sm_ssl_cert --ini-dir /x ca`".
    Command line tools print it as it is, never a traceback.
    """
