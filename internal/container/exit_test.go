package container

import "github.com/cmlproject/cml/internal/reaper"

type exitT = reaper.Exit
