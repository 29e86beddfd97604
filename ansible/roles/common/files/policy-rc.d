#!/bin/sh
# Installed by aiportal (common role) on hosts without an init system: package scripts must
# not start daemons; aiportal starts them itself with pid files.
exit 101
