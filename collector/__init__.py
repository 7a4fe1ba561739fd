"""otelbpf: the agent. It knows no probe by name; probes plug in through
collector.probe and the `otelbpf.probes` entry-point group."""
__version__ = "0.1.0"
