"""Tests of dnsgate.consent."""
