"""Virus scanner plugins (``virus/clamdscan``), named as qpsmtpd's ``virus/`` directory."""
