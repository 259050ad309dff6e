"""Integrations of wildcat with other libraries (imported on demand, never by `import wildcat`)."""
