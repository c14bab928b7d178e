"""The ``facesphere`` command line: one module per command group."""
