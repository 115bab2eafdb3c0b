"""Tests of dnsgate.dns."""
