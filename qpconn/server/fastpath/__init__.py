"""The one fenced place where qpconn reads Twisted's internals.

For speed (replies written straight to the socket, a reactor turn's replies batched,
handlers stepped without a Deferred when they never wait, socket events dispatched
without Twisted's per-event call layers) and for the one private switch
start-up needs (a listener that cannot bind stops the start). Every module here has a
plain fallback that is used (and tested) when the internals it relies on are absent;
nothing outside this package touches private Twisted attributes.
"""
