"""A FAKE easyeditor for tests of mote_plugin.register (see tests/test_register.py); not EasyEdit."""
