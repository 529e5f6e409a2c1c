"""The core: envelope, subjects, the Bus, the Backend protocol, errors. Imports nothing else of squadbus."""
