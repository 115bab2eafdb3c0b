"""Tests of dnsgate.cli: the command line as real processes."""
