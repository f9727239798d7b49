module github.com/kelpie/teleport

go 1.26.8
