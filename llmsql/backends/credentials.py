"""Credentials in backend URLs: what may be shown, logged or used as a key.

It sits next to the backend seam so that backends (:mod:`llmsql.backends.openai_compat`) and
the layers above them (:mod:`llmsql.cache`) share it without a backend importing upward.
"""

from __future__ import annotations

import urllib.parse


def strip_credentials(url: str, /) -> str:
    """Drop ``user:password@`` from a URL, so it can be shown, logged or used as a key.

    >>> strip_credentials("http://bob:s3cret@host:8000/v1")
    'http://host:8000/v1'
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
