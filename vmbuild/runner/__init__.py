"""The suspend-aware runner that ships alone to execute nodes.

Everything under this package uses only the Python standard library (plus, at most, small
pure-Python packages) and never imports the build side of vmbuild: it is packed into a
single-file zipapp and run on machines that have nothing else installed.
"""
