"""What crosses a process boundary, and nothing else: the message structs, the shared-memory slot layout,
the error codes and typed errors, the exit codes, the default endpoint and the client library.

The bottom of the tree beside `formats/`: the dispatcher (`daemon/`), the engine processes (`engines/`)
and every client (`loadgen_driver/`, applications, `prepare/demo.py`) import it; it imports none of them.
"""
