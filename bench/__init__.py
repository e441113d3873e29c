"""`make bench`: Mailroom and Postfix side by side under the same loads.

Run it with `python -m bench` (as root: Postfix only runs as root).  See
docs/performance.md for what each figure means and how to read the table.
"""
