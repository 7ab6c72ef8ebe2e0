"""The ``apex-rank`` command line. The only part of the core allowed to import the stages
(features, ranking, offline_eval): each module here registers a few subcommands, parses
arguments and calls one library function.
"""
