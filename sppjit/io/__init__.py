"""Input and output: traces, protection and memslot files, result tables and summaries.

Every reader checks its input and raises sppjit.errors.InputError with one line naming the
file, column and first bad row; every writer leaves either the complete file or nothing.
"""
