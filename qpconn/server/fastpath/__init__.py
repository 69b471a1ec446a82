"""The one fenced place where qpconn reads Twisted's internals for speed.

Every module here has a plain fallback that is used (and tested) when the internals it
relies on are absent; nothing outside this package touches private Twisted attributes.
"""
