"""`otelbpf top`: a live terminal view of what the agent collects.

snapshot: the agent's latest records as bounded JSON (served by the health
server, and made in-process when top runs the probes itself); model: deltas
between snapshots aggregated into the rows of each view; source: where
snapshots come from (a running agent, or probes top loads); app: the textual
screen."""
