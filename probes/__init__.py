"""Built-in probes. Each module pairs with bpf/<name>.bpf.c and registers
under the `otelbpf.probes` entry-point group in pyproject.toml."""
