"""AUTH plugins: they judge the credentials of SMTP AUTH (``auth/flat_file`` ...)."""
