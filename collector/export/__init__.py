"""Exporters: OTLP (gRPC, HTTP), a JSON-lines file, the live console view.

Each exporter runs behind an ExportWorker (bounded queue, own thread), so a
slow or absent backend never blocks collection.
"""
