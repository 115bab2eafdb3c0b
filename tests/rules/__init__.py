"""Tests of dnsgate.rules."""
