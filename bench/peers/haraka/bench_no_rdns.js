// Benchmark only: answer Haraka's lookup_rdns hook without asking DNS, as qpconn runs
// with --no-rdns. Without it every connection sends a PTR query to the system resolver,
// which is not on loopback.
exports.register = function () {
    this.register_hook('lookup_rdns', 'no_rdns')
}

exports.no_rdns = (next) => next(OK, 'localhost')
