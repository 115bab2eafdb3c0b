"""Tests of dnsgate.observe."""
