"""Every registered encoding runs the conformance class (``conformance.EncodingTests``): one subclass
per name in the registry, made here, so registering an encoding is enough to put it under test.
``SETTINGS`` only makes the captures small and adds each encoding's bad flags; an encoding missing
from it runs with its defaults."""


from logitcache.format.encodings import names
from tests.format.conformance import EncodingTests

SETTINGS = {
    "topk": dict(capture_flags=dict(top_k=8),
                 bad_flags=[(dict(draws=4), "--draws applies to --encoding sampled/hybrid, not topk")]),
    "adaptive": dict(capture_flags=dict(top_k=16, keep_mass=0.9),
                     bad_flags=[(dict(keep_mass=0.0), "--keep-mass must be in")]),
    "compact": dict(capture_flags=dict(top_k=16, keep_mass=0.95, bits=6),
                    bad_flags=[(dict(bits=1), "--bits must be"), (dict(keep_mass=1.5), "--keep-mass must be in")]),
    "sampled": dict(capture_flags=dict(draws=16, proposal_temperature=1.5),
                    bad_flags=[(dict(proposal_temperature=0.5), "--proposal-temperature must be >= 1"),
                               (dict(draws=0), "--draws must be")]),
    "hybrid": dict(capture_flags=dict(top_k=8, draws=16),
                   bad_flags=[(dict(draws=0), "--draws must be")]),
    "full": dict(capture_flags=dict(top_k=4),
                 bad_flags=[(dict(samples_per_shard=100), "too many for --encoding full")]),
}


def _conformance_class(name: str) -> type:
    settings = SETTINGS.get(name, {})
    return type(f"TestEncoding_{name}", (EncodingTests,), {"encoding_name": name, **settings})


for _name in names():
    globals()[f"TestEncoding_{_name}"] = _conformance_class(_name)


def test_every_registered_encoding_runs_the_conformance_class():
    assert {n for n in names()} == {c.encoding_name for c in globals().values()
                                    if isinstance(c, type) and issubclass(c, EncodingTests) and c is not EncodingTests}
    assert set(SETTINGS) <= set(names()), "settings for an encoding that is not registered"
